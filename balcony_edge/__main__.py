from balcony_edge.cli import main

main()
