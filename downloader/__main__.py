import sys

from downloader.cli import main

sys.exit(main())
