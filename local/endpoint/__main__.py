import sys

from local.endpoint.cli import main

sys.exit(main())
