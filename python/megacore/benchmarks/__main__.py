from megacore.benchmarks import main

raise SystemExit(main())
