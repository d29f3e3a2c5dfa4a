from lightning_ssl.cli import main

main()
