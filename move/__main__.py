import sys

from move.cli import main

sys.exit(main())
