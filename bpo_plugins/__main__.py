from bpo_plugins.cli import main

main()
