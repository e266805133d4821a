from minidist.cli import main

raise SystemExit(main())
