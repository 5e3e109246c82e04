from sdltag.cli import main

main()
