from imagebuilder.cli import main

raise SystemExit(main())
