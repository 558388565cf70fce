from winbuilder.cli import main

main()
