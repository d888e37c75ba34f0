
01KE34VF000000000000000004web
production"Gsha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc8ê?B
VERSIONv3R
/healthzË ÙZÄÄ`jwww.example.comzT
"https://github.com/example/web.gitmain(0000000000000000000000000000019b864dbc00ÄÄ¯∂≤∏3