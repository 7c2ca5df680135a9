from ditdeploy.cli import main

main()
