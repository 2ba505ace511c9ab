"""``python -m corral_fs``: run the fs driver (also the ``corral-fs-driver`` script's target)."""

from corral_fs.driver import main

if __name__ == "__main__":
    main()
