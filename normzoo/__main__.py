import sys

from normzoo.cli import main

sys.exit(main())
