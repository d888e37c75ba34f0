
webstagingprj-web(€Ðê¶·3