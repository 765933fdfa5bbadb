import sys

from kvd.daemon.service import main

sys.exit(main())
