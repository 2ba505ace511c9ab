"""``python -m corral_cron``: run the cron driver process."""

from corral_cron.driver import main

if __name__ == "__main__":
    main()
