from seekstack.cli.main import main

raise SystemExit(main())
