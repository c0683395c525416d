from cortex_edge.cli import main

main()
