"""The practitioner's tools: diagnostics, plots, repeated experiments, the LR range test, n-shot
studies, reward models, and the eval and chat commands."""
