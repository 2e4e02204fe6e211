"""What a learner may skip: checkpoint files, tokenizers and chat formats, options, run
directories and training checkpoints, metrics, devices and several processes, and the
bounded arithmetic that checks model-written equations without eval."""
