# Start-up: pick this port's board module, make the board, run the meter application.
import boards

board = boards.load().Board()
try:
    from meter import app
except ImportError as e:
    print("offline-topup: the meter application is not installed on this board (%s);"
          " deploy firmware/meter/ to /lib/meter/" % e)
    raise
app.run(board)
