"""``python -m corral_net``: run the net driver."""

from corral_net.driver import main

main()
