"""``python -m minibatch`` runs the command-line interface."""

from minibatch.cli import main

raise SystemExit(main())
