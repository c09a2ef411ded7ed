from local.endpoint.cli import main

main()
