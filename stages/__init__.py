"""One module per stage; each is a thin main(): parse args -> load config -> call pipeline -> report."""
