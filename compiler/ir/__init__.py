"""hetmap's IR: the graph of nodes, the typed annotations passes attach, and the printer."""
