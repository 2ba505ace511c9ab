"""``python -m corral_fs``: run the fs driver."""

from corral_fs.driver import main

main()
