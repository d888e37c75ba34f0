
workerstaging
prj-worker(€Ðê¶·3