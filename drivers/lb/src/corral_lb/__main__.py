"""``python -m corral_lb``: start the lb driver process."""

from corral_lb.driver import main

if __name__ == "__main__":
    main()
