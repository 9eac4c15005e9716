"""``python -m saq_deploy``: the CLI, so ``torchrun ... -m saq_deploy calibrate ...`` runs one rank each
(torchrun starts modules, not console scripts)."""

from saq_deploy.cli.app import main

if __name__ == "__main__":
    main()
