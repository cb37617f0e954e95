# Runs first at power-on.  Deliberately empty of hardware set-up: main.py makes the board
# object and hands it to the app (see README.md).  Keep this file free of work so that a
# fault here can never stop a meter from reaching its main loop.
