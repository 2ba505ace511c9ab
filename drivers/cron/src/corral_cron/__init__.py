"""corral cron driver."""
