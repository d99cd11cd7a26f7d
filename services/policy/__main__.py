from services.policy.server import main

if __name__ == "__main__":  # vLLM spawns worker processes: the guard is required
    main()
