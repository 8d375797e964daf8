"""`python -m eval.niah ...`: see `eval.niah`."""

from eval.niah.cli import main

if __name__ == "__main__":
  main()
