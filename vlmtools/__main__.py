from vlmtools.cli.app import main

main()
