"""`python -m kdjax`: the `kdjax` command (`kdjax.main`)."""

from kdjax.main import console

if __name__ == '__main__':
  console()
