"""`python -m hyperflux` runs the same CLI as the `hyperflux` console script (torchrun needs the module form)."""

from hyperflux.cli import main

raise SystemExit(main())
