from lata.cli import main

main()
