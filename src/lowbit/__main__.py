"""``python -m lowbit`` runs the CLI (also under torchrun)."""

from lowbit.cli import main

main()
