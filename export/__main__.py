import sys

from export.commandline import main

sys.exit(main())
