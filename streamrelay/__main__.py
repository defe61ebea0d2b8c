"""``python -m streamrelay``: the ``streamrelay`` console script (:mod:`streamrelay.cli`)."""

from streamrelay.cli import main

if __name__ == "__main__":
    main()
