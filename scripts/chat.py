"""Chat with a checkpoint: one reply to --message, or a conversation over the lines you type
(/quit or Ctrl-D ends; the history is kept).

    python scripts/chat.py --model runs/sft/checkpoints/best [--system "..." --temperature 0.6]
    python scripts/chat.py --model CKPT_DIR --message "What is 7 * 8?" --temperature 0
    python scripts/chat.py --help        # every option with its default
"""

from nanopost.tools.chat import ChatConfig, run_chat
from nanopost.plumbing.config import main_guard, parse_config


def main() -> None:
    run_chat(parse_config(ChatConfig, description=__doc__))


if __name__ == "__main__":
    main_guard(main)
