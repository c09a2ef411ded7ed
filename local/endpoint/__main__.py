from local.endpoint import main

main()
