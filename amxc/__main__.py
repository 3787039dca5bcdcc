import sys

from amxc.cli import main

sys.exit(main())
