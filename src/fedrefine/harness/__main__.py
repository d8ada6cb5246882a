"""``python -m fedrefine.harness [lm-eval arguments]``: see :mod:`fedrefine.harness.cli`."""

from fedrefine.harness.cli import main

if __name__ == "__main__":
    main()
