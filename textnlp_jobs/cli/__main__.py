from textnlp_jobs.cli import main

main()
