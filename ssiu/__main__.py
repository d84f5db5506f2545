import sys

from ssiu.cli import main

sys.exit(main())
