# Start-up of the PPMID (copied to the board as /main.py): pick this port's board module,
# make its PPMID board, run the PPMID application.
import boards

board = boards.load().PpmidBoard()
from ppmid import app
app.run(board)
