"""`python -m flux2lab <command> [args]`: the same as the `flux2lab` script."""

from flux2lab.cli.main import main

if __name__ == "__main__":
    main(prog="python -m flux2lab")
