from ape.cli import main

raise SystemExit(main())
