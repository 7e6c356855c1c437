import sys

from gradwise.cli import main

sys.exit(main())
