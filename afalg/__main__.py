from afalg.cli import main

raise SystemExit(main())
