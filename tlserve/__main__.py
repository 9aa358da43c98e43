from tlserve.cli import main

raise SystemExit(main())
