from weightd.cli import main

main()
